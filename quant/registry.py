"""A name -> class registry that refuses duplicates (formats and methods use one each)."""


class Registry(dict):
    def __init__(self, kind: str, name_attribute: str):
        super().__init__()
        self.kind, self.name_attribute = kind, name_attribute

    def register(self, name: str):
        """Class decorator adding the class under `name` (and setting its name attribute)."""
        def add(cls):
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            setattr(cls, self.name_attribute, name)
            self[name] = cls
            return cls
        return add
