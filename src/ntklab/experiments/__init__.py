"""One ``run(cfg)`` function per entry script; the scripts only compose the Hydra config."""
