"""The sample member reader that sits behind the gateway in ``demo`` and the tests."""
