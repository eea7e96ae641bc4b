"""Using a trained ensemble: the portable bundle (``bundle``) and prediction on new ECGs."""
