"""Train a network or its linearization on CIFAR-2 (classes 0-4 vs 5-9) with its real labels.

python train_cifar.py data.root=data data.num_train=1000 linearize=true
python train_cifar.py -m data.num_train=100,1000,10000 linearize=true,false seed=0,1,2
"""

from omegaconf import DictConfig

from ntklab.experiments import cli, train_cifar


@cli.hydra_main("train_cifar")
def main(cfg: DictConfig) -> None:
    train_cifar.run(cfg)


if __name__ == "__main__":
    main()
