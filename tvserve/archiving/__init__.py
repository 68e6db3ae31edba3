"""The archiving side: turning torchvision weights, training checkpoints and Python models into
`.mar` archives, checked and tuned for the machine (see docs/extending.md, "Layout")."""
