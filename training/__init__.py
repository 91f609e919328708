"""Training and evaluation of the Stage 2 refiner: losses, metrics, discriminator, Trainer."""
