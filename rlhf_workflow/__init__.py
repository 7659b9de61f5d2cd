"""rlhf-workflow: the online iterative RLHF workflow of Dong, Xiong et al. (2024) as a library and CLI."""

__version__ = "0.1.0"
