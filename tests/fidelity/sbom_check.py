"""Holds keybroker's image SBOM (deploy/image/sbom) to the CycloneDX project's own Python library:
the strict CycloneDX 1.5 JSON schema, then the library's object model and its package-URL parser.

Usage: sbom_check.py SBOM.json
Exits non-zero with the validator's message when the document is invalid; otherwise prints one
JSON object, {"components": [{type, name, version, scope, purl_type, purl_version}, ...]}, read
as the library understood it. Run by tests/image.rs.
"""

import json
import sys

from cyclonedx.model.bom import Bom
from cyclonedx.schema import SchemaVersion
from cyclonedx.validation.json import JsonStrictValidator

text = open(sys.argv[1], encoding="utf-8").read()
error = JsonStrictValidator(SchemaVersion.V1_5).validate_str(text)
if error is not None:
    print(f"not valid CycloneDX 1.5: {error}", file=sys.stderr)
    sys.exit(1)

bom = Bom.from_json(json.loads(text))
components = []
for c in bom.components:
    components.append(
        {
            "type": c.type.value,
            "name": c.name,
            "version": c.version,
            "scope": c.scope.value if c.scope else None,
            "purl_type": c.purl.type if c.purl else None,
            "purl_version": c.purl.version if c.purl else None,
        }
    )
print(json.dumps({"components": components}))
