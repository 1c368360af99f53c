"""`python -m training ARGS` is `forde train ARGS`; the entry point torchrun launches per rank:

torchrun --nproc_per_node=4 -m training training/configs/cifar10_resnet18.toml --out runs/c10
"""

from training.cli import train_main

if __name__ == "__main__":
    train_main()
