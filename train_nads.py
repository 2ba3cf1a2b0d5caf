"""Train a network or its linearization on a task along one NAD of compute_nads.py's run.

python train_nads.py                                         # LeNet (GeLU) on the top NAD
python train_nads.py model=lenet label_idx=10 linearize=false
python train_nads.py -m label_idx=0,1,2,5,10,20,50,100,200,500,1000 linearize=true,false
"""

from omegaconf import DictConfig

from ntklab.experiments import cli, train_nads


@cli.hydra_main("train_nads")
def main(cfg: DictConfig) -> None:
    train_nads.run(cfg)


if __name__ == "__main__":
    main()
