"""ivgr-dist: distributed RL training of iVGR (grounded + textual reasoning) on Ray, vLLM and FSDP2."""

__version__ = "0.1.0"
