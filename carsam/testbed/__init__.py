"""The embedded testbeds: `spec` (the small SAM's architecture, the shipped checkpoints and cards beside it),
`sam2_spec` (the SAM2 testbed's architecture: a small Hiera + SAM2's decoder, built by the `sam2` package),
`frames` (how each family frames training images and prompts), `train` (the training recipe), `build` (the
`carsam testbed build` command). Their data generator is `carsam.data.synthetic`.
"""
