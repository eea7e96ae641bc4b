"""Why a model predicted what it did: integrated-gradient saliency per expert and for the
ensemble, drawn on the 12-lead record."""
