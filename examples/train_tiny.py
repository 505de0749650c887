"""Train the bundled tiny byte-level SessaLM on the Python stdlib sources, on 2 CPU cores.

    python examples/train_tiny.py                 # 1400 steps, ~12 min on 2 idle cores (13 min cap)
    python examples/train_tiny.py --budget-min 0.5 --out /tmp/tiny   # a quick trial
    python examples/train_tiny.py --budget-min 90   # how the shipped model was made, on busy cores

Data: `sessa_export.data` (training split of the stdlib `.py` files, evaluation on the
shipped `assets/heldout.txt`). Optimiser: AdamW, linear warmup then cosine decay that ends
at --max-steps or at the time budget, whichever comes first, so training stops on schedule.
With both reached by steps (2 otherwise idle cores) a run is deterministic for a seed.
Reports held-out bits per byte of the model and of an add-one-smoothed byte bigram counted
on the training split, over the same held-out bytes (every byte after the first).
Writes `config.json` + `model.safetensors` with `save_checkpoint`, then `train_report.json`.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on shared cores spinning makes steps several times slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from sessa_export import data  # noqa: E402
from sessa_export.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from sessa_export.config import SessaConfig  # noqa: E402
from sessa_export.model import SessaLM, init_weights  # noqa: E402

LN2 = math.log(2.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command line: time budget, model shape, optimiser and output directory."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget-min", type=float, default=13.0,
                   help="wall-clock minutes from start until training stops (evaluation and saving follow)")
    p.add_argument("--max-steps", type=int, default=1400,
                   help="stop after this many steps (0: no limit); on 2 idle cores 1400 steps fit the default budget")
    p.add_argument("--out", type=Path, default=data.BUNDLED_MODEL, help="checkpoint directory to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--d-model", type=int, default=160)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--mlp-ratio", type=float, default=3.0)
    p.add_argument("--untied", action="store_true", help="separate LM head instead of tied embeddings")
    p.add_argument("--ctx", type=int, default=256, help="training context length in bytes")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--min-lr-frac", type=float, default=0.05, help="final learning rate as a fraction of peak")
    p.add_argument("--warmup", type=int, default=100, help="linear warmup steps")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--eval-stride", type=int, default=None, help="held-out sliding-window stride (default ctx/2)")
    p.add_argument("--rebuild-heldout", action="store_true",
                   help="rewrite assets/heldout.txt from this interpreter's stdlib before training")
    return p.parse_args(argv)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python and torch; return the generator that draws training windows."""
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def to_tensor(raw: bytes) -> torch.Tensor:
    """Bytes as a 1-D uint8 tensor (a copy, so it is writable)."""
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def sample_batch(stream: torch.Tensor, batch: int, ctx: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` windows of ctx + 1 bytes at uniformly drawn offsets, as int64 [batch, ctx + 1]."""
    starts = torch.randint(0, stream.numel() - ctx - 1, (batch,), generator=gen)
    index = starts[:, None] + torch.arange(ctx + 1)[None, :]
    return stream[index].long()


def lr_at(step: int, progress: float, args: argparse.Namespace) -> float:
    """Linear warmup over args.warmup steps, then cosine from peak to min_lr_frac * peak over progress in [0, 1]."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return args.lr * (args.min_lr_frac + (1.0 - args.min_lr_frac) * cosine)


def make_optimizer(model: SessaLM, args: argparse.Namespace) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not embeddings, biases, norms or gains)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.dim() >= 2 and not name.startswith("embed.") else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)


def build_model(args: argparse.Namespace) -> SessaLM:
    """A fresh SessaLM: GPT-style init, residual output projections scaled by 1/sqrt(2 * n_layers)."""
    config = SessaConfig(vocab_size=data.VOCAB_SIZE, d_model=args.d_model, n_layers=args.n_layers,
                         n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, max_len=None,
                         use_forward_rope=True, mlp_ratio=args.mlp_ratio, tie_embeddings=not args.untied)
    model = init_weights(SessaLM(config), seed=args.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("W_out.weight", "fc_out.weight")):
                p.mul_(1.0 / math.sqrt(2 * config.n_layers))
    return model


@torch.no_grad()
def model_bpb(model: SessaLM, raw: bytes, ctx: int, stride: int, batch: int = 32) -> float:
    """Bits per byte of bytes 1..N-1 of `raw`, each predicted with >= ctx - stride bytes of context (sliding windows)."""
    tokens = to_tensor(raw).long()
    n_pred = tokens.numel() - 1  # prediction i scores tokens[i + 1] given tokens[: i + 1]
    ends, e = [], min(ctx, n_pred)
    while True:
        ends.append(e)
        if e >= n_pred:
            break
        e = min(e + stride, n_pred)
    width = min(ctx, n_pred)
    total_nats, scored, prev = 0.0, 0, 0
    model.eval()
    for i in range(0, len(ends), batch):
        chunk = ends[i:i + batch]
        inputs = torch.stack([tokens[e - width:e] for e in chunk])
        targets = torch.stack([tokens[e - width + 1:e + 1] for e in chunk])
        nll = F.cross_entropy(model(inputs).transpose(1, 2), targets, reduction="none")  # [b, width]
        for row, e in enumerate(chunk):
            count = e - prev  # new predictions in this window: its last `count` positions
            total_nats += nll[row, width - count:].double().sum().item()
            scored += count
            prev = e
    assert scored == n_pred
    return total_nats / scored / LN2


def bigram_bpb(train: torch.Tensor, raw: bytes) -> float:
    """Bits per byte of bytes 1..N-1 of `raw` under an add-one-smoothed byte bigram counted on `train`."""
    pairs = train[:-1].long() * 256 + train[1:].long()
    counts = torch.bincount(pairs, minlength=256 * 256).view(256, 256).double() + 1.0
    log_prob = counts.log() - counts.sum(dim=1, keepdim=True).log()
    held = to_tensor(raw).long()
    return (-log_prob[held[:-1], held[1:]].mean() / LN2).item()


@torch.no_grad()
def generate(model: SessaLM, prompt: str, n_bytes: int, temperature: float = 0.0, seed: int = 0) -> str:
    """Continue `prompt` by n_bytes bytes with model.step (greedy when temperature is 0)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.tensor([data.encode(prompt)], dtype=torch.long)
    logits, state = model.step(ids, model.empty_state(1))
    out = []
    for _ in range(n_bytes):
        last = logits[0, -1]
        if temperature > 0:
            nxt = int(torch.multinomial(torch.softmax(last / temperature, -1), 1, generator=gen))
        else:
            nxt = int(last.argmax())
        out.append(nxt)
        logits, state = model.step(torch.tensor([[nxt]]), state)
    return data.decode(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.max_steps:
        args.max_steps = None
    t0, cpu0 = time.monotonic(), time.process_time()
    torch.set_num_threads(args.threads)
    gen = seed_everything(args.seed)
    budget_s = args.budget_min * 60.0
    stride = args.eval_stride or args.ctx // 2

    if args.rebuild_heldout or not data.HELDOUT_PATH.is_file():
        data.build_heldout()
        print(f"wrote {data.HELDOUT_PATH}")
    heldout = data.heldout_bytes()
    files = data.training_files()
    train = to_tensor(data.training_bytes())
    print(f"data: {len(files)} training files, {train.numel():,} bytes; held-out {len(heldout):,} bytes "
          f"({time.monotonic() - t0:.1f}s)", flush=True)

    model = build_model(args)
    opt = make_optimizer(model, args)
    config = model.config
    n_params = model.num_parameters()
    print(f"config: {json.dumps(config.to_dict())}")
    print(f"parameters: {n_params:,} ({4 * n_params / 1e6:.2f} MB fp32); batch {args.batch_size} x ctx {args.ctx}; "
          f"budget {args.budget_min:.2f} min, threads {torch.get_num_threads()}", flush=True)

    model.train()
    step, ema, t_train, time_led = 0, None, time.monotonic(), False
    while True:
        elapsed = time.monotonic() - t0
        if elapsed >= budget_s or (args.max_steps is not None and step >= args.max_steps):
            break
        # Whichever ends first, the step count or the time budget, ends the cosine.
        progress = (time.monotonic() - t_train) / max(1e-9, budget_s - (t_train - t0))
        if args.max_steps is not None and step / args.max_steps >= progress:
            progress = step / args.max_steps
        elif step >= args.warmup:
            time_led = True  # the LR followed the clock: the run is not reproducible step for step
        lr = lr_at(step, progress, args)
        for group in opt.param_groups:
            group["lr"] = lr
        batch = sample_batch(train, args.batch_size, args.ctx, gen)
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, config.vocab_size), batch[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        bpb = loss.item() / LN2
        ema = bpb if ema is None else 0.95 * ema + 0.05 * bpb
        if step % args.log_every == 0 or step == 1:
            dt = time.monotonic() - t_train
            print(f"step {step:5d} | {time.monotonic() - t0:6.1f}s | lr {lr:.2e} | train bpb {bpb:.3f} "
                  f"(ema {ema:.3f}) | grad {float(grad_norm):.2f} | {step * args.batch_size * args.ctx / dt:,.0f} tok/s",
                  flush=True)
    train_wall, train_cpu = time.monotonic() - t0, time.process_time() - cpu0
    stopped_by = "max_steps" if args.max_steps is not None and step >= args.max_steps else "budget"
    print(f"stopped after {step} steps ({stopped_by}), {train_wall:.1f}s wall, {train_cpu:.1f}s CPU", flush=True)

    model.eval()
    t_eval = time.monotonic()
    heldout_bpb = model_bpb(model, heldout, args.ctx, stride)
    baseline_bpb = bigram_bpb(train, heldout)
    print(f"held-out bpb: model {heldout_bpb:.4f} | bigram {baseline_bpb:.4f} ({time.monotonic() - t_eval:.1f}s)",
          flush=True)

    out = save_checkpoint(model, args.out)
    reloaded = load_checkpoint(out)
    prompt = "import os\n\n\ndef "
    sample = generate(reloaded, prompt, 200)
    sampled = generate(reloaded, prompt, 200, temperature=0.8, seed=args.seed)
    print(f"greedy sample:\n{prompt}{sample}\nsampled (T=0.8, seed {args.seed}):\n{prompt}{sampled}", flush=True)
    weights = out / "model.safetensors"
    report = {
        "config": config.to_dict(),
        "parameters": n_params,
        "weights_bytes": weights.stat().st_size,
        "steps": step,
        "tokens_seen": step * args.batch_size * args.ctx,
        "stopped_by": stopped_by,
        "schedule_led_by_clock": time_led,
        "train_wall_s": round(train_wall, 1),
        "train_cpu_s": round(train_cpu, 1),
        "total_wall_s": round(time.monotonic() - t0, 1),
        "final_train_bpb_ema": round(ema, 4) if ema is not None else None,
        "heldout_bpb": round(heldout_bpb, 4),
        "bigram_bpb": round(baseline_bpb, 4),
        "eval": {"heldout_file": "assets/heldout.txt", "heldout_bytes": len(heldout),
                 "heldout_sha256": hashlib.sha256(heldout).hexdigest(), "scored_bytes": len(heldout) - 1,
                 "window": args.ctx, "stride": stride,
                 "bigram": "add-one smoothed byte bigram counted on the training split"},
        "train": {"files": len(files), "bytes": train.numel(), "batch_size": args.batch_size, "ctx": args.ctx,
                  "optimizer": "AdamW(betas=(0.9, 0.95), eps=1e-8)", "lr": args.lr,
                  "schedule": f"linear warmup {args.warmup} steps, cosine to {args.min_lr_frac} x peak "
                              + f"ending at max_steps={args.max_steps} or the time budget, whichever first",
                  "weight_decay": args.weight_decay, "grad_clip": args.grad_clip, "seed": args.seed,
                  "budget_min": args.budget_min, "threads": args.threads},
        "sample_prompt": prompt,
        "sample_greedy": sample,
        "sample_t0.8": sampled,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (out / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out} ({weights.stat().st_size / 1e6:.2f} MB weights) and train_report.json; "
          f"total {time.monotonic() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
