"""An instance-level ``forward`` put on a module and taken off again (``module_graph.GraphedForward`` and
``compiled.CompiledForward`` use it): what was there before is remembered, so removing ours gives back exactly
the module's previous state — another instance ``forward`` if it had one, else the class's."""

from __future__ import annotations

import logging
from typing import Any, Callable

from torch import nn

logger = logging.getLogger(__name__)


class ForwardOverride:
    """One module's instance ``forward``: :meth:`install` sets ours, :meth:`uninstall` puts back what was there.

    ``what`` names the wrapper in the warning logged when ``uninstall`` finds that something else replaced our
    forward since (a hook library wrapping it): removing ours would remove theirs too, so it is left in place
    and ``uninstall`` returns False (the caller then disables its wrapper, which passes calls through)."""

    def __init__(self, module: nn.Module, what: str):
        self.module = module
        self.what = what
        self._had_instance_forward = "forward" in module.__dict__
        self._previous_instance_forward = module.__dict__.get("forward")
        self.installed: Callable[..., Any] | None = None

    def install(self, forward: Callable[..., Any]) -> None:
        """Sets ``forward`` as the module's instance ``forward`` (once: a second call keeps the first)."""
        if self.installed is None:
            self.installed = forward
            self.module.forward = forward

    def uninstall(self) -> bool:
        """Puts back the module's previous forward; False (nothing changed) when ours was replaced since."""
        installed, self.installed = self.installed, None
        if installed is None:
            return True
        if self.module.__dict__.get("forward") is not installed:
            logger.warning("ddim_fast: %s.forward was wrapped again after optimize(); %s now passes every call "
                           "through instead of being removed", type(self.module).__name__, self.what)
            return False
        if self._had_instance_forward:
            self.module.forward = self._previous_instance_forward
        else:
            del self.module.forward
        return True
