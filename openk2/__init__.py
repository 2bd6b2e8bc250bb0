"""openk2: an open, runnable implementation of the Kimi K2 recipe."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy so `import openk2` stays cheap for the CLI
    if name == "K2Config":
        from openk2.config import K2Config

        return K2Config
    if name == "K2ForCausalLM":
        from openk2.model import K2ForCausalLM

        return K2ForCausalLM
    raise AttributeError(name)
