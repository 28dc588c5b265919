"""The embedded default model: its synthetic corpus, its training and its evaluation (issue 4).

Nothing here runs when glmserve serves: these modules build the checkpoint the package ships.
`corpus` renders conversations with glmserve's own GLM-4.5 chat template, `train` trains a small Glm4Moe with the
project's model code and writes a Hugging Face-layout checkpoint, `evaluate` measures it offline.
"""
