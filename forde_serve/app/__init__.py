"""The entry points: the `forde` command line (`cli`), the BentoML HTTP service (`service`).

They parse and check what a user gives, then call the library (`forde_serve.runtime`,
`scoring`, `evaluation`, ...); no maths lives here.
"""
