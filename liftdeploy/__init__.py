"""liftdeploy: declarative deployments of schema-constrained LLM inference on Modal."""

__version__ = "0.1.0"
