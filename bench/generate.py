"""Text generation: tokens/s and time to first token, served sealed vs plaintext generate.

    .venv/bin/python bench/generate.py [--tokens 64] [--rounds 3] [--layers 8 --hidden 512]
                                       [--threads 1]

A seeded Llama-style model built from a config (no download), saved as a Hugging Face
directory with a tokenizer trained here, sealed, served by an in-process ``RuntimeServer``
(TLS on 127.0.0.1, the OpenAI-compatible streaming API) to a client in a second process,
and measured against plaintext ``transformers`` ``generate`` on the same weights in the
benchmark's process (before and after the served runs), greedy, batch 1.  Time to first
token is the first streamed content chunk (served) or the first token handed to a streamer
(plaintext).  On a 2-core machine ``--threads 1`` leaves a core for the server's event loop
and the client, as a deployment would.  Prints medians and ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hf_models import llama_config, train_tokenizer

import sealedtorch
from sealedtorch.attest.sim import init_platform
from sealedtorch.keys import ModelKey, StaticKeys
from sealedtorch.runtime.loader import ModelSource
from sealedtorch.runtime.server import RuntimeServer

PROMPT = "confidential models run inside a trusted execution environment"


class _FirstToken:
    """A generate() streamer that records when the first new token arrives."""

    def __init__(self) -> None:
        self.prompt_seen = False
        self.first: float | None = None

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
        elif self.first is None:
            self.first = time.perf_counter()

    def end(self) -> None:
        pass


def plaintext(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> tuple[float, float]:
    """In a worker thread, as the server generates: on a loaded machine torch's intra-op
    pool behaves very differently when driven from the main thread, which would skew the
    comparison either way."""
    result: list[tuple[float, float]] = []
    th = threading.Thread(target=lambda: result.append(_plaintext(model, ids, tokens)))
    th.start()
    th.join()
    return result[0]


def _plaintext(model: torch.nn.Module, ids: torch.Tensor, tokens: int) -> tuple[float, float]:
    streamer = _FirstToken()
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, streamer=streamer)
    total = time.perf_counter() - start
    n = out.shape[1] - ids.shape[1]
    assert streamer.first is not None
    return streamer.first - start, n / total


def _served_in_child(url: str, tokens: int, rounds: int, out: Any) -> None:
    """The client side in its own process (as a real client is): a client thread in the
    server's process would compete with generation for the GIL on a 2-core machine."""
    with httpx.Client(base_url=url, verify=False, timeout=600) as client:
        served(client, 4)  # warm
        out.put([served(client, tokens)[:2] for _ in range(rounds)])


def served(client: httpx.Client, tokens: int) -> tuple[float, float, int]:
    body = {"model": "llm", "prompt": PROMPT, "max_tokens": tokens, "temperature": 0,
            "stream": True}
    start = time.perf_counter()
    first: float | None = None
    text = []
    with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])["choices"][0]
            if chunk["text"] and first is None:
                first = time.perf_counter()
            text.append(chunk["text"])
    total = time.perf_counter() - start
    assert first is not None
    return first - start, tokens / total, len("".join(text))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads for both paths (default: torch's)")
    args = ap.parse_args()
    from transformers import LlamaForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="sealedtorch-bench-gen-") as tmp:
        work = Path(tmp)
        tokenizer = train_tokenizer()
        config = llama_config(len(tokenizer), hidden_size=args.hidden,
                              intermediate_size=args.hidden * 4,
                              num_hidden_layers=args.layers, num_attention_heads=8,
                              num_key_value_heads=4, max_position_embeddings=512)
        # min_new_tokens in both paths: a random model may emit EOS early.
        config.eos_token_id = None
        model = LlamaForCausalLM(config).eval()
        model.save_pretrained(work / "llm")
        tokenizer.save_pretrained(work / "llm")
        params = sum(p.numel() for p in model.parameters())
        key = ModelKey.generate("llm")
        sealedtorch.seal(work / "llm", work / "llm.sealed", key=key, progress=False)
        init_platform(work / "sim")
        srv = RuntimeServer.start([ModelSource("llm", work / "llm.sealed")],
                                  keys=StaticKeys(key), tee="sim", sim_platform=work / "sim")
        srv.wait_ready(300)
        ids = torch.tensor([tokenizer(PROMPT)["input_ids"]])
        print(f"Llama-style model: {args.layers} layers, hidden {args.hidden}, "
              f"{params / 1e6:.1f} M parameters; prompt {ids.shape[1]} tokens, "
              f"{args.tokens} new tokens, greedy, batch 1, {os.cpu_count()} cores, "
              f"torch threads {torch.get_num_threads()}")
        plaintext(model, ids, 4)  # warm
        plain_runs = [plaintext(model, ids, args.tokens) for _ in range(args.rounds)]
        ctx = mp.get_context("spawn")
        results = ctx.Queue()
        child = ctx.Process(target=_served_in_child,
                            args=(srv.url, args.tokens, args.rounds, results))
        child.start()
        served_runs = results.get(timeout=900)
        child.join()
        plain_runs += [plaintext(model, ids, args.tokens) for _ in range(args.rounds)]
        srv.stop()
    p_ttft = statistics.median(r[0] for r in plain_runs) * 1e3
    s_ttft = statistics.median(r[0] for r in served_runs) * 1e3
    p_tps = statistics.median(r[1] for r in plain_runs)
    s_tps = statistics.median(r[1] for r in served_runs)
    print(f"{'':<28}{'plaintext':>12}{'sealed, served':>16}{'ratio':>8}")
    print(f"{'tokens/s (median)':<28}{p_tps:>12.1f}{s_tps:>16.1f}{s_tps / p_tps:>8.3f}"
          "   (goal >= 0.95)")
    print(f"{'time to first token (ms)':<28}{p_ttft:>12.1f}{s_ttft:>16.1f}"
          f"{s_ttft / p_ttft:>8.2f}")
    print("served = OpenAI-compatible streaming over TLS on 127.0.0.1 (tokenize, generate, "
          "detokenize in the server); plaintext = transformers generate in this process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
