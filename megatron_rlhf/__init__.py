"""megatron-rlhf: the InstructGPT pipeline (SFT -> RM -> PPO-ptx) on NVIDIA Megatron-Core."""

__version__ = "0.1.0"
