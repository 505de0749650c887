"""Train the example model briefly on generated sequences and save it as users do:
`torch.save(model.state_dict(), "ckpt.pt")`.

The data are made-up "sentences" over the 48-token vocabulary: a random start token, then each token
the previous one plus a step that stays fixed within a sentence (mod 48), so the next token is
predictable from the context: enough for the exported model to have something to get right.

    python examples/reference_model/train.py --steps 150 --out ckpt.pt
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import VOCAB, build  # noqa: E402


def batch(generator: torch.Generator, size: int, length: int) -> torch.Tensor:
    """Sequences t_0, t_0 + k, t_0 + 2k, ... (mod VOCAB), each with its own start and step k in 1..5."""
    start = torch.randint(0, VOCAB, (size, 1), generator=generator)
    step = torch.randint(1, 6, (size, 1), generator=generator)
    return (start + step * torch.arange(length)[None, :]) % VOCAB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("ckpt.pt"))
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = build()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(args.steps):
        ids = batch(generator, args.batch, args.length + 1)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step}: loss {loss.item():.3f}")
    torch.save(model.state_dict(), args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
