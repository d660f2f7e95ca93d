"""marshmallow schemas: what the API accepts and what it answers, by resource.

- `fields`: the fields and parsers the others build on (times, any-case enums, task types)
- `tasks`: tasks, their list and its cursors
- `schedules`: recurring schedules
- `operations`: workers, stats and recovery
- `meta`: the error shape and health
"""
