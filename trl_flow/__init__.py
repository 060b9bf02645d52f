"""trl-flow: Flow-GRPO for flow-matching text-to-image models, on top of TRL's GRPOTrainer."""

__version__ = "0.1.0"
