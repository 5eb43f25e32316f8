"""The Shapes world: synthetic captioned images of coloured shapes and a small text-to-image model
trained on them, shipped as attnctrl's embedded default (``ac.load("shapes")``)."""
