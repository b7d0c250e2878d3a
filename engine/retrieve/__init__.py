"""Query and retrieve from remote PACS: the ``pacs`` entries of the site config put to use.

Above :mod:`engine.net` (the SCU speaks the protocol) and :mod:`engine.store`; the CLI's
``fiona pacs`` and ``fiona query`` commands are thin shells over :mod:`.peer` and :mod:`.query`.
"""
