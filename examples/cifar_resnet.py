"""Sparse training of a torchvision ResNet on CIFAR-10 with lightning-sparse.

CIFAR-10 is read from `--data-dir` (torchvision's `CIFAR10` layout; this script never downloads).
`--synthetic N` trains on N generated images instead, to try the pipeline without the data set:

    python examples/cifar_resnet.py --data-dir ~/data --method st3 --sparsity 0.9
    python examples/cifar_resnet.py --synthetic 256 --max-steps 5

By default it runs the ST-3 paper's CIFAR-10 recipe (Vanderschueren & De Vleeschouwer, WACV 2023):
160 epochs + 10 of fine-tune with frozen masks (170 in all), the cubic schedule from epoch 5 to 80,
SGD lr 0.1, momentum 0.9, weight decay 1e-4, the LR times 0.1 at epochs 80 and 120, batch 128,
gradient clipping by norm 3.0, random crop 32 (pad 4) and flip. Differences from the paper: the
network is a torchvision ResNet (`--arch`, ResNet-18 by default; the paper trains a ResNet-20), and
the whole 50k training set is used (the paper holds 5k out for validation). `--epochs` scales every
epoch above proportionally.
"""

from __future__ import annotations

import argparse
import os

import lightning.pytorch as pl
import torch
import torchmetrics
import torchvision
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from sparsity_args import add_sparsity_args, make_callback

PAPER_EPOCHS = 170  # 160 + 10 of fine-tune with frozen masks
# ST-3's CIFAR-10 schedule as fractions of the run: cubic from epoch 5 to 80, masks frozen at 160.
ST3_SCHEDULE = {"start": 5 / PAPER_EPOCHS, "end": 80 / PAPER_EPOCHS, "freeze_at": 160 / PAPER_EPOCHS}
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cifar_resnet(arch: str) -> nn.Module:
    """A torchvision ResNet for 32x32 inputs: 3x3 stem, no max-pool (the usual CIFAR adaptation)."""
    model = torchvision.models.get_model(arch, weights=None, num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class CifarClassifier(pl.LightningModule):
    def __init__(
        self, arch: str = "resnet18", lr: float = 0.1, weight_decay: float = 1e-4, epochs: int = PAPER_EPOCHS
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = cifar_resnet(arch)
        self.example_input_array = torch.zeros(1, 3, 32, 32)
        self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self(x), y)
        self.log("test/acc", self.test_acc)

    def configure_optimizers(self) -> dict:
        # The paper's: SGD, momentum 0.9, LR x0.1 at epochs 80 and 120 of 170 (scaled with `epochs`).
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=self.hparams.weight_decay
        )
        milestones = [round(epoch * self.hparams.epochs / PAPER_EPOCHS) for epoch in (80, 120)]
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}


def datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset]:
    normalize = transforms.Normalize(CIFAR_MEAN, CIFAR_STD)
    if args.synthetic:
        fake = transforms.Compose([transforms.ToTensor(), normalize])
        return (
            torchvision.datasets.FakeData(args.synthetic, (3, 32, 32), 10, transform=fake, random_offset=0),
            torchvision.datasets.FakeData(args.synthetic, (3, 32, 32), 10, transform=fake, random_offset=1),
        )
    if not os.path.isdir(os.path.join(args.data_dir, "cifar-10-batches-py")):
        raise SystemExit(
            f"--data-dir {args.data_dir!r} holds no cifar-10-batches-py/: download CIFAR-10 there first "
            "(this script never downloads), or pass --synthetic N to try it on generated images"
        )
    augment = transforms.Compose(
        [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(), normalize]
    )
    plain = transforms.Compose([transforms.ToTensor(), normalize])
    return (
        torchvision.datasets.CIFAR10(args.data_dir, train=True, transform=augment),
        torchvision.datasets.CIFAR10(args.data_dir, train=False, transform=plain),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sparsity_args(parser, s_init=-100.0, threshold_decay=5e-4)
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N", help="train on N generated images")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--epochs", type=int, default=PAPER_EPOCHS)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out-dir", default="runs")
    args = parser.parse_args()

    pl.seed_everything(0)
    train_set, test_set = datasets(args)
    loader = {"batch_size": args.batch_size, "num_workers": args.workers, "persistent_workers": args.workers > 0}
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        logger=pl.loggers.WandbLogger(project="lightning-sparse-cifar", save_dir=args.out_dir, offline=True),
        callbacks=make_callback(args, **ST3_SCHEDULE) if args.method in ("st3", "st3sigma") else make_callback(args),
        gradient_clip_val=3.0,
        default_root_dir=args.out_dir,
    )
    model = CifarClassifier(args.arch, epochs=args.epochs)
    trainer.fit(model, DataLoader(train_set, shuffle=True, **loader))
    (result,) = trainer.test(model, DataLoader(test_set, **loader), verbose=False)
    print(f"test accuracy: {result['test/acc']:.4f}")


if __name__ == "__main__":
    main()
