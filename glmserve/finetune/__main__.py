import sys

from glmserve.finetune.train import main

sys.exit(main())
