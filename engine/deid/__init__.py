"""De-identification (PS3.15 Annex E): profiles, pseudonyms, verification, burned-in gates."""
