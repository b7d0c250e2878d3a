-- fiona index, version 12: converted files (NIfTI, BIDS) in the outbox beside DICOM instances.
-- kind: '' for a DICOM instance, else the convert step's format ('nifti', 'bids'); name: the
-- file's path below the study folder (nifti) or the dataset folder (bids) at a destination.
-- For a converted file sop_instance_uid holds a key unique in its transfer, not a UID.
ALTER TABLE transfer_items ADD COLUMN kind TEXT NOT NULL DEFAULT '';
ALTER TABLE transfer_items ADD COLUMN name TEXT NOT NULL DEFAULT '';
