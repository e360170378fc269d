"""A small causal language model with tied input/output embeddings, trained sparse with ST-3.

A character-level transformer learns this repository's own text (README and package source, read at
run time: nothing is downloaded). Its output layer shares its weight with the input embedding, as
GPT-2's does; lightning-sparse sparsifies that weight once, on both modules, together with every
attention projection and MLP weight. At the end come the per-layer budget table (attention FLOPs
included), the validation loss and perplexity of the hardened model, the check that hardening
changed no logit, and a sample:

    python examples/causal_lm.py                 # ST-3 at 80 %, a few minutes on 2 CPU cores
    python examples/causal_lm.py --sparsity 0.9 --max-steps 1000 --width 128
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from lightning_sparse import SparsityCallback, harden

REPOSITORY = Path(__file__).resolve().parent.parent


def corpus() -> str:
    """The repository's README and package source, the text the model learns."""
    files = [REPOSITORY / "README.md", *sorted((REPOSITORY / "lightning_sparse").rglob("*.py"))]
    return "\n".join(path.read_text(encoding="utf-8") for path in files)


class Windows(Dataset[Tensor]):
    """Every `context + 1` characters of `tokens`, starting every `stride`: input and next-character target."""

    def __init__(self, tokens: Tensor, context: int, stride: int) -> None:
        self.tokens, self.context, self.stride = tokens, context, stride

    def __len__(self) -> int:
        return (len(self.tokens) - self.context - 1) // self.stride

    def __getitem__(self, index: int) -> Tensor:
        start = index * self.stride
        return self.tokens[start : start + self.context + 1]


class CharTransformer(pl.LightningModule):
    """Pre-norm causal transformer; `head.weight` is `embed.weight` (tied)."""

    def __init__(self, vocab: int, width: int, layers: int, heads: int, context: int, lr: float) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Embedding(vocab, width)
        self.position = nn.Parameter(torch.zeros(1, context, width))
        block = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight
        # GPT-2's initialisation: every matrix at one scale, so one global magnitude threshold (ST-3's) compares
        # like with like; PyTorch's defaults give the embedding std 1 and the linear layers ~1/sqrt(width).
        for parameter in self.parameters():
            if parameter.dim() >= 2:
                nn.init.normal_(parameter, std=0.02)
        self.example_input_array = torch.zeros(1, context, dtype=torch.long)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        hidden = self.embed(tokens) + self.position[:, :length]
        return self.head(self.norm(self.blocks(hidden, mask=mask, is_causal=True)))

    def loss(self, batch: Tensor) -> Tensor:
        logits = self(batch[:, :-1])
        return nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        self.log("val_loss", self.loss(batch), prog_bar=True)

    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, self.hparams.lr, total_steps=self.trainer.estimated_stepping_batches, pct_start=0.1
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


@torch.no_grad()
def sample(model: CharTransformer, alphabet: str, prompt: str, length: int, temperature: float = 0.7) -> str:
    """`length` characters continuing `prompt`, drawn at `temperature` with a fixed seed (greedy decoding of a
    small model trained on indented source code falls into runs of spaces)."""
    index = {c: i for i, c in enumerate(alphabet)}
    tokens = torch.tensor([[index[c] for c in prompt if c in index]])
    context = model.hparams.context
    generator = torch.Generator().manual_seed(0)
    for _ in range(length):
        probabilities = torch.softmax(model(tokens[:, -context:])[:, -1] / temperature, dim=-1)
        next_token = torch.multinomial(probabilities, 1, generator=generator)
        tokens = torch.cat([tokens, next_token], dim=1)
    return "".join(alphabet[i] for i in tokens[0].tolist())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.8, help="ST-3's target sparsity")
    parser.add_argument("--max-steps", type=int, default=200, help="optimizer steps")
    parser.add_argument("--width", type=int, default=96, help="embedding width")
    parser.add_argument("--layers", type=int, default=2, help="transformer layers")
    parser.add_argument("--heads", type=int, default=4, help="attention heads")
    parser.add_argument("--context", type=int, default=64, help="characters of context")
    parser.add_argument("--batch-size", type=int, default=32, help="sequences per batch")
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (one-cycle)")
    parser.add_argument("--val-batches", type=int, default=20, help="validation batches per evaluation")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data order")
    parser.add_argument("--output", type=Path, default=Path("runs/causal_lm"), help="log directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train, harden, check and sample; returns the figures it prints."""
    args = parse_args(argv)
    pl.seed_everything(args.seed, verbose=False)
    text = corpus()
    alphabet = "".join(sorted(set(text)))
    index = {c: i for i, c in enumerate(alphabet)}
    tokens = torch.tensor([index[c] for c in text])
    split = int(0.9 * len(tokens))
    train = DataLoader(Windows(tokens[:split], args.context, 1), batch_size=args.batch_size, shuffle=True)
    validation = DataLoader(Windows(tokens[split:], args.context, args.context), batch_size=args.batch_size)
    model = CharTransformer(len(alphabet), args.width, args.layers, args.heads, args.context, args.lr)
    callback = SparsityCallback("st3", args.sparsity, harden_on_fit_end=False)
    trainer = pl.Trainer(
        max_steps=args.max_steps,
        val_check_interval=min(200, args.max_steps),
        check_val_every_n_epoch=None,
        limit_val_batches=args.val_batches,
        callbacks=[callback],
        logger=pl.loggers.CSVLogger(args.output),
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=args.output,
    )
    trainer.fit(model, train, validation)

    # Hardening must not change what the model computes, tied embedding included.
    batch = next(iter(validation))
    model.eval()
    with torch.no_grad():
        before = model(batch[:, :-1])
    harden(model)
    with torch.no_grad():
        change = (model(batch[:, :-1]) - before).abs().max().item()
    assert model.head.weight is model.embed.weight, "hardening untied the embedding"
    loss = trainer.validate(model, validation, verbose=False)[0]["val_loss"]  # `limit_val_batches` of them
    weights = model.embed.weight.numel() + sum(
        p.numel() for name, p in model.blocks.named_parameters() if name.endswith("weight") and p.dim() == 2
    )
    zeros = int((model.embed.weight == 0).sum()) + sum(
        int((p == 0).sum()) for name, p in model.blocks.named_parameters() if name.endswith("weight") and p.dim() == 2
    )
    figures = {"val_loss": loss, "perplexity": math.exp(loss), "sparsity": zeros / weights, "hardening_change": change}
    print(
        f"\nST-3 {args.sparsity:.0%}: sparsity {figures['sparsity']:.1%} over the embedding (tied to the output layer) "
        f"and every attention and MLP weight; validation loss {loss:.3f} (perplexity {figures['perplexity']:.2f}) "
        f"after hardening, which changed no logit by more than {change:.1e}."
    )
    print(f"Sample: {sample(model, alphabet, 'The callback ', 200)!r}")
    return figures


if __name__ == "__main__":
    main()
