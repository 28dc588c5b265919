"""`glmserve serve` (OpenAI-compatible server), `glmserve chat` (terminal chat, glmserve.chat_cli),
`glmserve generate` (one-shot generation), `glmserve bench serve|offline` (benchmarks, glmserve.bench) and
`glmserve finetune` (LoRA fine-tuning, glmserve.finetune).

Flags carry both spellings where vLLM and SGLang differ, so the model card's commands work with `vllm serve` /
`python3 -m sglang.launch_server` replaced by `glmserve serve`. A flag value that cannot work is refused before
anything loads, with a message naming the flag and a non-zero exit.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import logging
import os
import socket
import sys
from pathlib import Path

from glmserve.cli_lora import add_lora_flags, lora_engine_fields

logger = logging.getLogger("glmserve")

SPECULATIVE_ALGORITHMS = ("EAGLE", "NEXTN", "MTP")  # SGLang's names; for GLM-4.5 each drafts with the MTP layer


def default_model_path() -> str:
    """The checkpoint used when MODEL is omitted: the embedded glm-4.5-nano that ships in the package."""
    from glmserve.models import EMBEDDED_MODEL

    return str(EMBEDDED_MODEL)


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="checkpoint directory (config.json, safetensors, tokenizer)")
    p.add_argument("--model-path", "--model", dest="model_path", help="the same, as SGLang and vLLM spell it")
    p.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    p.add_argument("--weight-dtype", default="auto", choices=("auto", "float32", "float16"),
                   help="CPU with fp32 compute: float16 keeps large linear weights (lm_head, dense MLPs) and large "
                        "routed experts in half precision, halving the bytes a decode step reads")
    p.add_argument("--quantization", "-q", help="weights held quantized, fp32 compute on CPU: fp8, int8 (per "
                   "channel), int4 (groups of 128), q8_0 / q4_0 (groups of 32); an FP8 checkpoint keeps fp8 by default")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--load-format", default="auto", choices=("auto", "dummy"),
                   help="dummy: random weights from config.json alone, no safetensors read (for timing shapes)")
    p.add_argument("--max-model-len", "--context-length", dest="max_model_len", type=int,
                   help="context length (prompt + output); default: what the model and the KV cache allow")
    p.add_argument("--gpu-memory-utilization", "--mem-fraction-static", dest="gpu_memory_utilization", type=float,
                   default=0.9, help="fraction of free GPU memory for the KV cache")
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="KV cache size on CPU, in GiB")
    p.add_argument("--num-kv-blocks", type=int, help="KV cache size in blocks (overrides the memory budgets)")
    p.add_argument("--block-size", "--page-size", dest="block_size", type=int, default=16)
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="auto (the compute dtype), fp8 (= fp8_e4m3), fp8_e4m3, fp8_e5m2 or bfloat16: K and V stored "
                        "in 1 or 2 bytes with the checkpoint's k_scale/v_scale (else 1.0)")
    p.add_argument("--calculate-kv-scales", action="store_true",
                   help="with an fp8 KV cache: per-layer scales from the first step's keys and values (vLLM's rule)")
    p.add_argument("--attention-backend", help="cpu_native (default: the native paged-attention kernel, else "
                                               "torch_blockwise), torch_blockwise (reads the paged cache in place) or "
                                               "torch_native (the reference: gathers each context, one SDPA call)")
    p.add_argument("--max-num-seqs", "--max-running-requests", dest="max_num_seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--long-prefill-token-threshold", type=int, default=0,
                   help="the most prompt tokens one request prefills per step (0: up to the step's budget)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--disable-radix-cache", action="store_true", help="SGLang's spelling of --no-enable-prefix-caching")
    p.add_argument("--seed", "--random-seed", dest="seed", type=int, default=0)
    p.add_argument("--tensor-parallel-size", "--tp-size", "--tp", dest="tensor_parallel_size", type=int, default=1)
    p.add_argument("--pipeline-parallel-size", "--pp-size", "--pp", dest="pipeline_parallel_size", type=int,
                   default=1, help="split the layers across this many stages (ranks: tensor x pipeline size)")
    p.add_argument("--pp-max-micro-batch-size", type=int,
                   help="SGLang's: requests per pipeline micro-batch (default: a step's batch in pp-size parts "
                        "when each gets 128 tokens or more, else whole)")
    p.add_argument("--step-timeout", type=float, default=30.0,
                   help="tensor parallel: seconds a rank may keep the others waiting in a step before the engine "
                        "fails (a hung rank)")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="split the routed experts whole across the tensor-parallel ranks instead of slicing each")
    p.add_argument("--ep-size", "--expert-parallel-size", dest="ep_size", type=int, default=1,
                   help="SGLang's spelling: the same as --enable-expert-parallel when it equals --tp-size")
    p.add_argument("--trust-remote-code", action="store_true", help="accepted; glmserve never runs checkpoint code")
    add_lora_flags(p)
    spec = p.add_argument_group("speculative decoding with the checkpoint's MTP layer (SGLang's or vLLM's flags)")
    spec.add_argument("--speculative-algorithm", type=str.upper, choices=SPECULATIVE_ALGORITHMS,
                      help="EAGLE, NEXTN or MTP: all draft with the MTP layer")
    spec.add_argument("--speculative-num-steps", type=int, help="draft tokens per step (chained MTP steps)")
    spec.add_argument("--speculative-eagle-topk", type=int, default=1, help="only 1 (chain drafting)")
    spec.add_argument("--speculative-num-draft-tokens", type=int, help="with topk 1: num-steps + 1")
    spec.add_argument("--speculative-config",
                      help='vLLM\'s JSON, e.g. \'{"method": "mtp", "num_speculative_tokens": 3}\'')


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glmserve", description="Inference engine and OpenAI-compatible server "
                                                                 "for GLM-4.5 models.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run the OpenAI- and Anthropic-compatible server", allow_abbrev=False,
        description="Serve a GLM-4.5 checkpoint over HTTP: OpenAI's /v1/chat/completions, /v1/completions and "
                    "/v1/responses, Anthropic's /v1/messages. MODEL is a local checkpoint directory; without one, "
                    "the embedded glm-4.5-nano is served. Listens on 0.0.0.0:8000 unless --host/--port say "
                    "otherwise. Reasoning and tool calls are parsed with the glm45 parsers unless turned off "
                    "(--reasoning-parser none, --tool-call-parser none).")
    _add_engine_flags(serve)
    serve.add_argument("--host", default="0.0.0.0", help="address to listen on (default: 0.0.0.0)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    serve.add_argument("--served-model-name", nargs="+", help="model name(s) clients use; default: MODEL as given")
    serve.add_argument("--api-key", default=os.environ.get("GLMSERVE_API_KEY"),
                       help="require `Authorization: Bearer KEY` (or `x-api-key: KEY`) on /v1 (default: "
                            "$GLMSERVE_API_KEY)")
    serve.add_argument("--tokenize-without-api-key", action="store_true",
                       help="serve /tokenize and /detokenize without the API key (by default they need it)")
    serve.add_argument("--chat-template", help="a chat template file, or the template text itself")
    serve.add_argument("--reasoning-parser", default="glm45",
                       help="glm45 (default): split <think> reasoning into reasoning_content; none: leave it in "
                            "the content")
    serve.add_argument("--tool-call-parser", default="glm45",
                       help="glm45 (default): parse <tool_call> blocks into tool_calls; none: no tool calling "
                            "(requests with tools get 400)")
    serve.add_argument("--enable-auto-tool-choice", action="store_true",
                       help="accepted for vLLM's command line; tool calling is on unless --tool-call-parser none")
    serve.add_argument("--tool-strict-level", choices=["auto", "function", "parameter"], default="auto",
                       help="vLLM's: auto holds calls to their schemas for tool_choice required/named and strict "
                            "tools; function also holds every call's name; parameter treats every tool as strict")
    serve.add_argument("--disable-shared-experts-fusion", action="store_true",
                       help="accepted for SGLang's command line; glmserve has no fusion to disable")
    serve.add_argument("--cpu-offload-gb", type=float, default=0.0)
    serve.add_argument("--data-parallel-size", "--dp-size", "-dp", dest="data_parallel_size", type=int, default=1,
                       help="engine replicas behind this server, each in its own process with its share of the CPU "
                            "threads; requests go to the replica holding the longest cached prefix, else the least "
                            "loaded (glmserve.engine.data_parallel)")
    serve.add_argument("--uvicorn-log-level", default="warning", help="uvicorn's own logging (info: access log)")
    nodes = serve.add_argument_group("several nodes (SGLang's flags; vLLM's --headless, --master-addr/-port)")
    nodes.add_argument("--nnodes", type=int, default=1, help="nodes the tensor x pipeline ranks are spread over")
    nodes.add_argument("--node-rank", type=int, default=0,
                       help="this node's place; node 0 serves HTTP and schedules, the others run ranks only")
    nodes.add_argument("--dist-init-addr", help="HOST:PORT of node 0, where every node meets (the same on all)")
    nodes.add_argument("--master-addr", help="vLLM's spelling: with --master-port, the same as --dist-init-addr")
    nodes.add_argument("--master-port", type=int)
    nodes.add_argument("--headless", action="store_true",
                       help="a node other than node 0: no API server, its ranks run node 0's steps")
    nodes.add_argument("--dist-timeout", type=float, default=120.0,
                       help="seconds a node waits at --dist-init-addr for the others before it fails")
    limits = serve.add_argument_group("limits and lifecycle (glmserve.serving.limits, glmserve.serving.lifecycle)")
    limits.add_argument("--max-queued-requests", type=int, default=1024,
                        help="sequences that may wait beyond --max-num-seqs; more get 503 with Retry-After (SGLang)")
    limits.add_argument("--max-request-body-mb", type=float, default=16.0, help="larger request bodies get 413")
    limits.add_argument("--max-output-tokens", type=int,
                        help="the largest max_tokens a request may ask for (400 beyond); default: the context length")
    limits.add_argument("--request-timeout", type=float,
                        help="seconds a request may run in the engine before it is ended with 408; default: none")
    limits.add_argument("--shutdown-timeout", type=float, default=30.0,
                        help="on SIGTERM, seconds that requests in flight may take to finish (vLLM)")
    limits.add_argument("--request-read-timeout", type=float, default=30.0,
                        help="seconds a request may take to send its headers and body (408 and closed beyond)")
    limits.add_argument("--limit-concurrency", type=int,
                        help="open connections at most, 503 beyond (uvicorn); default: what the open-file limit allows")
    limits.add_argument("--enable-log-requests", action="store_true",
                        help="log each request's prompt and parameters (vLLM); prompts are never logged otherwise")
    limits.add_argument("--max-log-len", type=int, help="with --enable-log-requests: characters (and token ids) of a "
                                                        "prompt to log (vLLM); default: all")
    # Test-only, hidden from --help: a JSON script of outputs (glmserve.testing.scripted); an engine step that
    # raises after N steps, or steps slowed by MS milliseconds (glmserve.testing.faults).
    serve.add_argument("--scripted-output-file", help=argparse.SUPPRESS)
    serve.add_argument("--inject-fault-after-steps", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--inject-step-delay-ms", type=float, help=argparse.SUPPRESS)

    generate = commands.add_parser("generate", help="generate text for one prompt and print it", allow_abbrev=False)
    _add_engine_flags(generate)
    generate.add_argument("--prompt", required=True, help="the prompt; '-' reads it from stdin")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    generate.add_argument("--no-thinking", action="store_true", help="with --chat: thinking mode off")
    generate.add_argument("--max-tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0)

    chat = commands.add_parser("chat", help="chat with the model in the terminal", allow_abbrev=False)
    _add_engine_flags(chat)
    chat.add_argument("--system", help="a system message that starts the conversation")
    chat.add_argument("--max-tokens", type=int, default=1024, help="the longest reply, reasoning included")
    chat.add_argument("--temperature", type=float, help="default: the checkpoint's generation_config.json")
    chat.add_argument("--scripted-output-file", help=argparse.SUPPRESS)  # test-only, as for serve

    from glmserve.finetune.flags import add_arguments as add_finetune_arguments

    add_finetune_arguments(commands.add_parser("finetune", help="train a LoRA adapter (PEFT layout) on chat data",
                                               allow_abbrev=False))

    from glmserve.bench import (
        add_parsers,  # flag definitions only; the benchmarks import their code when run
    )

    add_parsers(commands.add_parser("bench", help="benchmark a server (serve) or a checkpoint in-process (offline)",
                                    allow_abbrev=False))
    return parser


def _model_path(parser: argparse.ArgumentParser, args) -> str:
    model = args.model_path or args.model or default_model_path()
    if not Path(model, "config.json").is_file():
        parser.error(f"{model} is not a checkpoint directory (no config.json); glmserve loads local checkpoints, "
                     f"e.g. downloaded with `huggingface-cli download zai-org/GLM-4.5-Air --local-dir DIR`")
    from glmserve.config import ConfigError, ModelConfig

    try:  # a bad config.json is a start-up error, not a failure after the server is up
        ModelConfig.from_pretrained(model)
    except ConfigError as e:
        parser.error(f"{model}: {e}")
    return model


def _check_devices(parser: argparse.ArgumentParser, tp: int, device: str) -> None:
    if tp == 1:
        return
    import torch

    cuda = device != "cpu" and torch.cuda.is_available()
    available = torch.cuda.device_count() if cuda else len(os.sched_getaffinity(0))
    if tp > available:  # one process per rank, each on its own GPU or CPU core at least
        parser.error(f"--tensor-parallel-size {tp} needs {tp} devices (one process each), but {available} "
                     f"{'CUDA devices are' if cuda else 'CPU cores are'} available")


def _expert_parallel(args) -> bool:
    from glmserve.config import ConfigError

    if args.ep_size not in (1, args.tensor_parallel_size):
        raise ConfigError(f"--ep-size {args.ep_size} must be 1 or the tensor-parallel size "
                          f"({args.tensor_parallel_size}): expert parallelism splits the experts across those ranks")
    return args.enable_expert_parallel or args.ep_size > 1


def _speculative_tokens(args) -> int:
    """SGLang's --speculative-* flags or vLLM's --speculative-config → MTP draft tokens per step (0: off)."""
    from glmserve.config import ConfigError, num_speculative_tokens

    if args.speculative_config is not None:
        if args.speculative_algorithm or args.speculative_num_steps:
            raise ConfigError("give either --speculative-config (vLLM) or --speculative-algorithm and "
                              "--speculative-num-steps (SGLang), not both")
        return num_speculative_tokens(args.speculative_config)
    if args.speculative_algorithm is None:
        if args.speculative_num_steps or args.speculative_num_draft_tokens:
            raise ConfigError("--speculative-num-steps needs --speculative-algorithm (EAGLE, NEXTN or MTP)")
        return 0
    if args.speculative_eagle_topk != 1:
        raise ConfigError(f"--speculative-eagle-topk {args.speculative_eagle_topk}: only 1 is supported (chain "
                          f"drafting; tree drafting with topk > 1 is not implemented)")
    steps = args.speculative_num_steps or 3  # SGLang's default for EAGLE/NEXTN with topk 1
    if args.speculative_num_draft_tokens not in (None, steps + 1):
        raise ConfigError(f"--speculative-num-draft-tokens must be --speculative-num-steps + 1 ({steps + 1}) "
                          f"with --speculative-eagle-topk 1, got {args.speculative_num_draft_tokens}")
    return steps


def _engine_config(parser: argparse.ArgumentParser, args, model: str):
    from glmserve.config import (
        ConfigError,
        EngineConfig,
        ModelConfig,
        check_speculative_decoding,
    )

    nnodes = getattr(args, "nnodes", 1)
    _check_devices(parser, args.tensor_parallel_size * args.pipeline_parallel_size // max(nnodes, 1), args.device)
    try:
        num_draft_tokens = _speculative_tokens(args)
        model_config = ModelConfig.from_pretrained(model)
        check_speculative_decoding(model_config, num_draft_tokens)
        return EngineConfig(
            model=model, dtype=args.dtype, weight_dtype=args.weight_dtype, load_format=args.load_format,
            quantization=args.quantization,
            device=args.device,
            max_model_len=args.max_model_len,
            block_size=args.block_size, kv_cache_memory_gb=args.kv_cache_memory_gb,
            gpu_memory_utilization=args.gpu_memory_utilization, num_kv_blocks=args.num_kv_blocks,
            max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
            long_prefill_token_threshold=args.long_prefill_token_threshold,
            enable_prefix_caching=args.enable_prefix_caching and not args.disable_radix_cache, seed=args.seed,
            tensor_parallel_size=args.tensor_parallel_size, enable_expert_parallel=_expert_parallel(args),
            num_speculative_tokens=num_draft_tokens, step_timeout=args.step_timeout,
            pipeline_parallel_size=args.pipeline_parallel_size,
            pp_max_micro_batch_size=args.pp_max_micro_batch_size, **_node_flags(args),
            kv_cache_dtype=args.kv_cache_dtype, calculate_kv_scales=args.calculate_kv_scales,
            attention_backend=_attention_backend(args.attention_backend),
            **lora_engine_fields(parser, args, model_config))
    except ConfigError as e:
        parser.error(str(e))


def _node_flags(args) -> dict:
    """--nnodes, --node-rank, --dist-init-addr (or vLLM's --master-addr/--master-port), --dist-timeout."""
    from glmserve.config import ConfigError

    if not hasattr(args, "nnodes"):  # generate / chat: one node
        return {}
    address = args.dist_init_addr
    if args.master_addr is not None or args.master_port is not None:
        if address is not None or args.master_addr is None or args.master_port is None:
            raise ConfigError("give either --dist-init-addr HOST:PORT or both --master-addr and --master-port")
        address = f"{args.master_addr}:{args.master_port}"
    if args.headless and args.node_rank == 0:
        raise ConfigError("--headless is for the nodes other than node 0 (--node-rank 1 and up): node 0 serves")
    return {"nnodes": args.nnodes, "node_rank": args.node_rank, "dist_init_addr": address,
            "dist_timeout": args.dist_timeout}


def _attention_backend(name: str | None) -> str | None:
    from glmserve.config import ConfigError
    from glmserve.layers.attention import ATTENTION_BACKENDS

    if name is not None and name not in ATTENTION_BACKENDS:
        raise ConfigError(f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {name!r}")
    return name


def _chat_template(parser: argparse.ArgumentParser, flag: str | None, tokenizer) -> str:
    from glmserve.serving.templates import glm45_chat_template

    if flag is None:
        return tokenizer.chat_template or glm45_chat_template()
    if Path(flag).is_file():
        return Path(flag).read_text(encoding="utf-8")
    if "{" not in flag:
        parser.error(f"--chat-template {flag}: no such file (and not a template)")
    return flag


def serve(parser: argparse.ArgumentParser, args) -> int:
    if args.cpu_offload_gb:
        parser.error("--cpu-offload-gb is not supported")
    from glmserve.serving.parsers import check_parser_names

    reasoning_parser, tool_call_parser = (None if name == "none" else name
                                          for name in (args.reasoning_parser, args.tool_call_parser))
    try:
        check_parser_names(reasoning_parser, tool_call_parser)
    except ValueError as e:
        parser.error(str(e))
    model = _model_path(parser, args)
    config = _engine_config(parser, args, model)
    from glmserve.engine.tensor_parallel import run_worker_node, torchrun_rank

    if config.node_rank > 0 or torchrun_rank() not in (None, 0):  # a worker node: no server, node 0's steps
        from glmserve.config import ModelConfig

        return run_worker_node(ModelConfig.from_pretrained(model), config)
    limits = _serving_limits(parser, args)

    from glmserve.engine.engine_client import AsyncEngineClient
    from glmserve.serving.app import build_app
    from glmserve.serving.lifecycle import run_server
    from glmserve.serving.state import ServerState
    from glmserve.serving.tokenizer import Tokenizer

    tokenizer = Tokenizer(model)
    template = _chat_template(parser, args.chat_template, tokenizer)

    load_engine = functools.partial(_load_engine, config, args.scripted_output_file, args.inject_fault_after_steps,
                                    args.inject_step_delay_ms)
    data_parallel = _data_parallel_engine(parser, args, config, load_engine)
    client = AsyncEngineClient(load_engine if data_parallel is None else data_parallel.start)
    # vLLM names a served model by the path it was given; the built-in default goes by its directory's name.
    given = args.model_path or args.model
    names = args.served_model_name or [model if given else Path(model).name]
    state = ServerState(client, tokenizer, template, names, model, reasoning_parser, tool_call_parser,
                        args.api_key, limits, args.enable_log_requests, args.max_log_len,
                        tokenize_without_api_key=args.tokenize_without_api_key,
                        tool_strict_level=args.tool_strict_level)
    if data_parallel is not None:
        from glmserve.serving.dp_metrics import DataParallelCollector

        state.metrics.registry.register(DataParallelCollector(data_parallel))
    try:
        sock = socket.create_server((args.host, args.port), family=socket.AF_INET6 if ":" in args.host
                                    else socket.AF_INET)
    except OSError as e:
        parser.error(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}")
    keep_alive = os.environ.get("GLMSERVE_KEEP_ALIVE_ON_ENGINE_DEATH", "") not in ("", "0")
    return asyncio.run(run_server(build_app(state), sock, client, names, log_level=args.uvicorn_log_level,
                                  shutdown_timeout=args.shutdown_timeout, in_flight=state.in_flight,
                                  request_read_timeout=args.request_read_timeout,
                                  limit_concurrency=args.limit_concurrency, keep_alive_on_engine_death=keep_alive))


def _load_engine(config, scripted_output_file: str | None, inject_fault_after_steps: int | None,
                 inject_step_delay_ms: float | None):
    """The serving engine, with the test-only runners when asked for; a module-level function, so that
    data-parallel replicas can build theirs in their own processes."""
    from glmserve.engine.llm_engine import LLMEngine

    engine = LLMEngine(config, progress=False, wait_for_kv_memory=False)  # answer while the pool is being backed
    if scripted_output_file:
        from glmserve.serving.tokenizer import Tokenizer
        from glmserve.testing.scripted import ScriptedRunner

        engine.runner = ScriptedRunner.from_file(engine.runner, scripted_output_file, Tokenizer(config.model))
    if inject_fault_after_steps is not None or inject_step_delay_ms:
        from glmserve.testing.faults import FaultyRunner

        engine.runner = FaultyRunner(engine.runner, inject_fault_after_steps, (inject_step_delay_ms or 0) / 1000)
    return engine


def _data_parallel_engine(parser: argparse.ArgumentParser, args, config, load_engine):
    """With --data-parallel-size > 1, the engine over the replicas (not started yet); else None."""
    dp = args.data_parallel_size
    if dp < 1:
        parser.error(f"--data-parallel-size must be at least 1, got {dp}")
    if dp == 1:
        return None
    from glmserve.engine.data_parallel import DataParallelEngine
    from glmserve.engine.model_runner import resolve_device

    if config.enable_lora:  # the replicas would each need the adapters, and the router their names
        parser.error("--enable-lora with --data-parallel-size > 1 is not supported yet")
    if resolve_device(config.device).type != "cpu":
        parser.error("--data-parallel-size > 1 runs on CPU only for now (each replica would need GPUs of its own)")
    if config.nnodes > 1:
        parser.error("--data-parallel-size > 1 runs on one node for now (its replicas are local processes)")
    ranks = config.tensor_parallel_size * config.pipeline_parallel_size
    processes, cores = dp * ranks, len(os.sched_getaffinity(0))
    if processes > cores:
        parser.error(f"--data-parallel-size {dp} x {ranks} ranks (--tensor-parallel-size x --pipeline-parallel-size)"
                     f" needs {processes} processes, one CPU core each at least, but {cores} cores are available")
    return DataParallelEngine(load_engine, dp, config.step_timeout)


def _serving_limits(parser: argparse.ArgumentParser, args):
    from glmserve.serving.limits import ServingLimits

    for flag, value, low in (("--max-queued-requests", args.max_queued_requests, 0),
                             ("--max-output-tokens", args.max_output_tokens, 1),
                             ("--shutdown-timeout", args.shutdown_timeout, 0),
                             ("--max-log-len", args.max_log_len, 0),
                             ("--limit-concurrency", args.limit_concurrency, 1)):
        if value is not None and value < low:
            parser.error(f"{flag} must be at least {low}, got {value}")
    for flag, value in (("--max-request-body-mb", args.max_request_body_mb),
                        ("--request-timeout", args.request_timeout),
                        ("--request-read-timeout", args.request_read_timeout)):
        if value is not None and not value > 0:
            parser.error(f"{flag} must be positive, got {value}")
    return ServingLimits(max_num_seqs=args.max_num_seqs, max_queued_requests=args.max_queued_requests,
                         max_request_body_bytes=int(args.max_request_body_mb * 2**20),
                         request_timeout=args.request_timeout, max_output_tokens=args.max_output_tokens)


def generate(parser: argparse.ArgumentParser, args) -> int:
    from glmserve.llm import LLM
    from glmserve.serving.chat_template import render_chat
    from glmserve.types import SamplingParams

    model = _model_path(parser, args)
    config = _engine_config(parser, args, model)
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    llm = LLM(model, **{k: v for k, v in dataclasses.asdict(config).items() if k != "model"})
    if args.chat:
        template = _chat_template(parser, None, llm.tokenizer)
        kwargs = {"enable_thinking": False} if args.no_thinking else {}
        prompt = render_chat(template, [{"role": "user", "content": prompt}], **llm.tokenizer.special_tokens_map,
                             **kwargs)
    out = llm.generate(prompt, SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens,
                                              seed=args.seed))
    print(out[0].outputs[0].text)
    return 0


def chat(parser: argparse.ArgumentParser, args) -> int:
    from glmserve.chat_cli import run
    from glmserve.serving.tokenizer import Tokenizer

    model = _model_path(parser, args)
    config = _engine_config(parser, args, model)
    tokenizer = Tokenizer(model)
    return run(config, tokenizer, _chat_template(parser, None, tokenizer), args.max_tokens, args.temperature,
               args.system, args.scripted_output_file)


def bench(parser: argparse.ArgumentParser, args) -> int:
    from glmserve.bench import main as run_bench

    return run_bench(args, parser)


def finetune(parser: argparse.ArgumentParser, args) -> int:
    from glmserve.finetune.train import finetune as run_finetune

    try:
        run_finetune(args)
    except ValueError as e:  # bad data (DataError), a bad flag value, an unusable checkpoint to resume
        parser.error(str(e))
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s %(name)s: %(message)s")
    parser = _build_parser()
    args = parser.parse_args(argv)
    from glmserve.config import ConfigError

    try:
        return {"serve": serve, "chat": chat, "generate": generate, "bench": bench,
                "finetune": finetune}[args.command](parser, args)
    except ConfigError as e:
        parser.error(str(e))
