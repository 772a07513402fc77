"""The codec author's kit: ``metabridge new-codec`` (scaffold) and ``metabridge check-codec``
(conformance checks, also a pytest helper)."""
