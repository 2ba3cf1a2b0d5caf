"""Neural anisotropy directions of a network at initialization.

python compute_nads.py                          # LeNet (GeLU), [32, 32, 1] inputs, at the origin
python compute_nads.py model=resnet18 nads.input_std=1.0     # ResNet-18 at x0 ~ N(0, I)
"""

from omegaconf import DictConfig

from ntklab.experiments import cli, compute_nads


@cli.hydra_main("compute_nads")
def main(cfg: DictConfig) -> None:
    compute_nads.run(cfg)


if __name__ == "__main__":
    main()
