"""What only backup uses: the plan, the session, quiesce, staging, mounts and the journal."""
