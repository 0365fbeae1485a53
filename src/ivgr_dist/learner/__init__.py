"""Learner side of the GRPO loop.

``grpo`` holds the loss maths as pure torch functions (group advantages, log-probabilities from
logits, the clipped surrogate, the k3 KL penalty); the sharded training workers build on it.
"""
