"""Memory and FLOPs estimates and the plan command's figures and lints."""
