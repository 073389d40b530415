"""One module per golden component; each exposes `run(case) -> dict[str, torch.Tensor]`.

The module for a component is `infinite_talk.testing.golden_cases.<component>`. A component without a module is
reported as skipped (not implemented), never as passed.
"""
