"""import-linter contract types of this repository (pyproject.toml [tool.importlinter]
contract_types). Not part of the package: `lint-imports`, run from the repository root, imports
them with the working directory on sys.path."""
