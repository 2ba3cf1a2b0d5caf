"""Train a network or its linearization on the sign of an eNTK eigenvector of compute_ntk.py's run.

python train_ntk.py                                          # LeNet on the embedded digits data
python train_ntk.py model=lenet data.dataset=cifar10 label_idx=10 linearize=false
python train_ntk.py -m label_idx=0,1,2,5,10,20,50,100 linearize=true,false
"""

from omegaconf import DictConfig

from ntklab.experiments import cli, train_ntk


@cli.hydra_main("train_ntk")
def main(cfg: DictConfig) -> None:
    train_ntk.run(cfg)


if __name__ == "__main__":
    main()
