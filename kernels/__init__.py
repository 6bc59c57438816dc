"""Triton kernels, installed as `sparsefast.kernels`. One file per kernel family; each is reached through
`sparsefast.ops`, which owns the torch twin and the backend dispatch. Importing this package does not import triton."""
