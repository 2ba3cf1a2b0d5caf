"""Network vs. its linearization at θ0 vs. its linearization at the trained parameters.

python pretrained_ntk_comparison.py                          # LeNet on the embedded digits data
python pretrained_ntk_comparison.py model=lenet data.dataset=cifar10 label_idx=10
"""

from omegaconf import DictConfig

from ntklab.experiments import cli, pretrained_ntk_comparison


@cli.hydra_main("pretrained_ntk_comparison")
def main(cfg: DictConfig) -> None:
    pretrained_ntk_comparison.run(cfg)


if __name__ == "__main__":
    main()
