"""Local HTTP stand-ins of provider APIs that keep state, for tests that drive real SDKs."""
