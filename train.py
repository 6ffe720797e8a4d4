"""python train.py model=tiny optim=muon_lion trainer=cpu — see conf/train.yaml."""

from nanoternary.cli.train import main

if __name__ == "__main__":
    main()
