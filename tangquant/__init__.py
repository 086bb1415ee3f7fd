"""tangquant: ship a LoRA fine-tune of a Qwen chat model to Xeon CPUs as a faithful INT4 model."""

__version__ = "0.1.0"
