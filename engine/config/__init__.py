"""The bottom of the engine: config files, their schemas and their problems.

* :mod:`.issues`: ``ConfigIssue`` (``file:line path: message``) and the wording of messages;
* :mod:`.files`: YAML (or JSON) read within bounds, with the line of every key;
* :mod:`.schema`: the JSON Schemas in ``schemas/``, their defaults, and the one place a
  jsonschema error becomes a message people can act on (``schema_issues``);
* :mod:`.sections`: the registry the layers above fill with what they add to a project file
  and to ``rulesets/`` (:mod:`engine.projects` registers them);
* :mod:`.model`, :mod:`.loader`: the site and project files as frozen dataclasses;
  :mod:`.rulesets`: where rule sets are; :mod:`.validate`: ``fiona validate``.

Nothing here imports the layers above (``lint-imports`` checks it).
"""
