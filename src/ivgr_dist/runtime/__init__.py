"""Runtime services every command and role uses: starting or joining Ray and seeding (``startup``), placement
groups, rendezvous stores, the shared-storage probe, shared-memory cleanup, logs, signals, metrics and the
torchvision import fix.
"""
