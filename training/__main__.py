"""`python -m training ARGS` is `forde train ARGS`; the entry point torchrun launches per rank:

torchrun --nproc_per_node=4 -m training training/configs/cifar10_resnet18.toml --out runs/c10
"""

from forde_serve.app.cli import train

if __name__ == "__main__":
    train.main(prog_name="python -m training")
