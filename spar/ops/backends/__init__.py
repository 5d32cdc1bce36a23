"""spar's op backends, one package each (``torch``, ``triton``, ``cuda``). A backend
supplies primitives (kernels, launchers, backward math) and registers them with
:func:`spar.ops.library.define`; it knows nothing about estimators or layers.

They live here rather than directly under ``spar.ops`` because a subpackage named
``torch`` there would replace the ``torch`` module in ``spar.ops``' own namespace once
imported (a package's attributes are its ``__init__``'s globals)."""
