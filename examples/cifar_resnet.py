"""Sparse training of a torchvision ResNet on CIFAR-10 with lightning-sparse.

CIFAR-10 is read from `--data-dir` (torchvision's `CIFAR10` layout; this script never downloads).
`--synthetic N` trains on N generated images instead, to try the pipeline without the data set:

    python examples/cifar_resnet.py --data-dir ~/data --method st3 --sparsity 0.9 --epochs 160
    python examples/cifar_resnet.py --synthetic 256 --max-steps 5
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

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


def cifar_resnet(arch: str) -> nn.Module:
    """A torchvision ResNet for 32x32 inputs: 3x3 stem, no max-pool (the usual CIFAR adaptation)."""
    model = torchvision.models.get_model(arch, weights=None, num_classes=10)
    model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


class CifarClassifier(pl.LightningModule):
    def __init__(self, arch: str = "resnet18", lr: float = 0.1, weight_decay: float = 5e-4) -> None:
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
        optimizer = torch.optim.SGD(
            self.parameters(), lr=self.hparams.lr, momentum=0.9, nesterov=True, weight_decay=self.hparams.weight_decay
        )
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.estimated_stepping_batches)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


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
    parser.add_argument("--epochs", type=int, default=160)
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
        callbacks=make_callback(args),
        default_root_dir=args.out_dir,
    )
    model = CifarClassifier(args.arch)
    trainer.fit(model, DataLoader(train_set, shuffle=True, **loader))
    (result,) = trainer.test(model, DataLoader(test_set, **loader), verbose=False)
    print(f"test accuracy: {result['test/acc']:.4f}")


if __name__ == "__main__":
    main()
