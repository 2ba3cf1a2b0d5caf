"""Empirical NTK eigendecomposition at initialization.

python compute_ntk.py                                   # LeNet on the embedded digits data
python compute_ntk.py model=lenet data.dataset=cifar10 data.root=data
"""

from omegaconf import DictConfig

from ntklab.experiments import cli, compute_ntk


@cli.hydra_main("compute_ntk")
def main(cfg: DictConfig) -> None:
    compute_ntk.run(cfg)


if __name__ == "__main__":
    main()
