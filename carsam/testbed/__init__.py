"""The embedded testbed: `spec` (the small SAM's architecture, the shipped checkpoint and card beside it),
`train` (the training recipe), `build` (the `carsam testbed build` command). Its data generator is
`carsam.data.synthetic`.
"""
