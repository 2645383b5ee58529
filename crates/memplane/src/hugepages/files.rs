//! Files in hugetlbfs mounts (placeholder; being written).
