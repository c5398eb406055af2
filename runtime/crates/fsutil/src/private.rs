//! Files only their owner may use: signing keys, the compile cache's key. On Unix, mode
//! 0600. On Windows, a protected access list (nothing inherited from the directory) that
//! admits the account that wrote the file, SYSTEM and Administrators, with full control
//! each, and no one else: the agent runs as SYSTEM, a signing machine as its user.
//!
//! [`exposure`] tells whether anyone else may read or write such a file, so that a key
//! loosened after it was written is refused rather than trusted.
//!
//! Under Wine (a test platform, never a deployment), access lists are not kept: Wine 8
//! accepts a new list and goes on reporting the one it derives from the Unix mode
//! (SYSTEM, the user, and Everyone allowed to read), whatever was set. There [`exposure`]
//! cannot tell and answers `None`; [`under_wine`] says when that is the case.

use std::path::Path;

/// Restricts `path` to its owner (see the module documentation).
///
/// # Errors
///
/// When the permissions cannot be read or set.
pub fn restrict(path: &Path) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
    }
    #[cfg(windows)]
    {
        win::restrict(path)
    }
    #[cfg(not(any(unix, windows)))]
    {
        let _ = path;
        Ok(())
    }
}

/// Whether this process runs under Wine, where access lists cannot be checked (see the
/// module documentation). Always false off Windows.
pub fn under_wine() -> bool {
    #[cfg(windows)]
    {
        win::under_wine()
    }
    #[cfg(not(windows))]
    {
        false
    }
}

/// Who besides the owner may read or write `path`, in words (`None` when nobody may):
/// on Unix, group or other permission bits; on Windows, an allowing entry of the access
/// list for anyone but the owner, the agent's own account, SYSTEM and Administrators, or
/// no access list at all.
///
/// # Errors
///
/// When the permissions cannot be read.
pub fn exposure(path: &Path) -> std::io::Result<Option<String>> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(path)?.permissions().mode() & 0o777;
        Ok((mode & 0o077 != 0).then(|| {
            format!("its mode is {mode:o}: other users may read or write it (chmod 600 it)")
        }))
    }
    #[cfg(windows)]
    {
        win::exposure(path)
    }
    #[cfg(not(any(unix, windows)))]
    {
        let _ = path;
        Ok(None)
    }
}

#[cfg(windows)]
mod win {
    use std::os::windows::ffi::OsStrExt as _;
    use std::path::Path;
    use std::ptr::{null, null_mut};

    use windows_sys::Win32::Foundation::{
        CloseHandle, ERROR_SUCCESS, GENERIC_ALL, GENERIC_READ, GENERIC_WRITE, HANDLE, LocalFree,
    };
    use windows_sys::Win32::Security::Authorization::{
        ConvertSidToStringSidW, ConvertStringSecurityDescriptorToSecurityDescriptorW,
        GetNamedSecurityInfoW, SDDL_REVISION_1, SE_FILE_OBJECT, SetNamedSecurityInfoW,
    };
    use windows_sys::Win32::Security::{
        ACCESS_ALLOWED_ACE, ACE_HEADER, ACL, DACL_SECURITY_INFORMATION, EqualSid, GetAce,
        GetSecurityDescriptorDacl, GetTokenInformation, IsWellKnownSid, OWNER_SECURITY_INFORMATION,
        PROTECTED_DACL_SECURITY_INFORMATION, PSECURITY_DESCRIPTOR, PSID, TOKEN_QUERY, TOKEN_USER,
        TokenUser, WinBuiltinAdministratorsSid, WinCreatorOwnerRightsSid, WinLocalSystemSid,
    };
    use windows_sys::Win32::Storage::FileSystem::{
        FILE_APPEND_DATA, FILE_READ_DATA, FILE_WRITE_DATA, WRITE_DAC, WRITE_OWNER,
    };
    use windows_sys::Win32::System::LibraryLoader::{GetModuleHandleW, GetProcAddress};
    use windows_sys::Win32::System::SystemServices::ACCESS_ALLOWED_ACE_TYPE;
    use windows_sys::Win32::System::Threading::{GetCurrentProcess, OpenProcessToken};

    /// Rights that let someone read the secret or change it.
    const RIGHTS: u32 = FILE_READ_DATA
        | FILE_WRITE_DATA
        | FILE_APPEND_DATA
        | WRITE_DAC
        | WRITE_OWNER
        | GENERIC_READ
        | GENERIC_WRITE
        | GENERIC_ALL;

    fn wide(text: &std::ffi::OsStr) -> Vec<u16> {
        text.encode_wide().chain([0]).collect()
    }

    fn last_error() -> std::io::Error {
        std::io::Error::last_os_error()
    }

    /// Memory Windows allocated for us, freed with `LocalFree`.
    struct Local(*mut core::ffi::c_void);

    impl Drop for Local {
        fn drop(&mut self) {
            if !self.0.is_null() {
                // SAFETY: the pointer came from an API that allocates with LocalAlloc.
                unsafe { LocalFree(self.0) };
            }
        }
    }

    /// The user SID of this process's token, as `S-1-...` text, and its bytes.
    fn process_user() -> std::io::Result<(String, Vec<u64>)> {
        let mut token: HANDLE = null_mut();
        // SAFETY: plain calls with out-pointers to locals.
        if unsafe { OpenProcessToken(GetCurrentProcess(), TOKEN_QUERY, &mut token) } == 0 {
            return Err(last_error());
        }
        let mut len = 0u32;
        // SAFETY: a size query (null buffer, length 0) into a local.
        unsafe { GetTokenInformation(token, TokenUser, null_mut(), 0, &mut len) };
        // u64 words: aligned for TOKEN_USER, which holds a pointer.
        let mut buf = vec![0u64; (len as usize).div_ceil(8).max(1)];
        // SAFETY: `buf` holds at least `len` bytes.
        let ok = unsafe {
            GetTokenInformation(token, TokenUser, buf.as_mut_ptr().cast(), len, &mut len)
        };
        // SAFETY: `token` was opened above.
        unsafe { CloseHandle(token) };
        if ok == 0 {
            return Err(last_error());
        }
        // SAFETY: GetTokenInformation(TokenUser) filled `buf` with a TOKEN_USER whose SID
        // points into `buf`.
        let sid = unsafe { (*buf.as_ptr().cast::<TOKEN_USER>()).User.Sid };
        Ok((sid_text(sid), buf))
    }

    fn sid_text(sid: PSID) -> String {
        let mut text = null_mut();
        // SAFETY: `sid` is a valid SID; the string is freed by `Local`.
        if unsafe { ConvertSidToStringSidW(sid, &mut text) } == 0 {
            return "an unknown account".into();
        }
        let _free = Local(text.cast());
        // SAFETY: a NUL-terminated UTF-16 string from ConvertSidToStringSidW.
        let len = (0..).take_while(|&i| unsafe { *text.add(i) } != 0).count();
        // SAFETY: `len` characters were just read.
        String::from_utf16_lossy(unsafe { std::slice::from_raw_parts(text, len) })
    }

    pub(super) fn restrict(path: &Path) -> std::io::Result<()> {
        let (user, _keep) = process_user()?;
        // Protected (P): nothing inherited. Full access (FA) for this account, SYSTEM (SY)
        // and Administrators (BA).
        let sddl = wide(format!("D:P(A;;FA;;;{user})(A;;FA;;;SY)(A;;FA;;;BA)").as_ref());
        let mut sd: PSECURITY_DESCRIPTOR = null_mut();
        // SAFETY: a NUL-terminated SDDL string; `sd` is freed by `Local`.
        if unsafe {
            ConvertStringSecurityDescriptorToSecurityDescriptorW(
                sddl.as_ptr(),
                SDDL_REVISION_1,
                &mut sd,
                null_mut(),
            )
        } == 0
        {
            return Err(last_error());
        }
        let _free = Local(sd);
        let (mut present, mut defaulted) = (0, 0);
        let mut dacl: *mut ACL = null_mut();
        // SAFETY: `sd` is the descriptor just made.
        if unsafe { GetSecurityDescriptorDacl(sd, &mut present, &mut dacl, &mut defaulted) } == 0 {
            return Err(last_error());
        }
        let name = wide(path.as_os_str());
        // SAFETY: a NUL-terminated path; the DACL lives in `sd`, alive until the end.
        let rc = unsafe {
            SetNamedSecurityInfoW(
                name.as_ptr(),
                SE_FILE_OBJECT,
                DACL_SECURITY_INFORMATION | PROTECTED_DACL_SECURITY_INFORMATION,
                null_mut(),
                null_mut(),
                dacl,
                null(),
            )
        };
        if rc != ERROR_SUCCESS {
            return Err(std::io::Error::from_raw_os_error(rc as i32));
        }
        Ok(())
    }

    /// Wine's ntdll exports `wine_get_version`; Windows' does not.
    pub(super) fn under_wine() -> bool {
        let ntdll = wide("ntdll.dll".as_ref());
        // SAFETY: a NUL-terminated module name and procedure name.
        unsafe {
            let module = GetModuleHandleW(ntdll.as_ptr());
            !module.is_null()
                && GetProcAddress(module, c"wine_get_version".as_ptr().cast()).is_some()
        }
    }

    pub(super) fn exposure(path: &Path) -> std::io::Result<Option<String>> {
        if under_wine() {
            return Ok(None);
        }
        let name = wide(path.as_os_str());
        let (mut owner, mut dacl, mut sd): (PSID, *mut ACL, PSECURITY_DESCRIPTOR) =
            (null_mut(), null_mut(), null_mut());
        // SAFETY: a NUL-terminated path and out-pointers to locals; `sd` (which holds
        // `owner` and `dacl`) is freed by `Local`.
        let rc = unsafe {
            GetNamedSecurityInfoW(
                name.as_ptr(),
                SE_FILE_OBJECT,
                OWNER_SECURITY_INFORMATION | DACL_SECURITY_INFORMATION,
                &mut owner,
                null_mut(),
                &mut dacl,
                null_mut(),
                &mut sd,
            )
        };
        if rc != ERROR_SUCCESS {
            return Err(std::io::Error::from_raw_os_error(rc as i32));
        }
        let _free = Local(sd);
        if dacl.is_null() {
            return Ok(Some(
                "it has no access list: everyone may read and write it".into(),
            ));
        }
        let (_, user) = process_user()?;
        // SAFETY: `user` holds a TOKEN_USER (see process_user).
        let user_sid = unsafe { (*user.as_ptr().cast::<TOKEN_USER>()).User.Sid };
        // SAFETY: `dacl` points into `sd`.
        let count = unsafe { (*dacl).AceCount };
        for i in 0..u32::from(count) {
            let mut ace = null_mut();
            // SAFETY: `i` is below the ACL's count.
            if unsafe { GetAce(dacl, i, &mut ace) } == 0 {
                return Err(last_error());
            }
            // SAFETY: every ACE starts with an ACE_HEADER.
            let header = unsafe { &*ace.cast::<ACE_HEADER>() };
            if u32::from(header.AceType) != ACCESS_ALLOWED_ACE_TYPE {
                continue;
            }
            // SAFETY: an access-allowed ACE, whose SID starts at `SidStart`.
            let allowed = unsafe { &*ace.cast::<ACCESS_ALLOWED_ACE>() };
            if allowed.Mask & RIGHTS == 0 {
                continue;
            }
            let sid: PSID = (&raw const allowed.SidStart).cast_mut().cast();
            // SAFETY: valid SIDs from the descriptor and the token.
            let trusted = unsafe {
                (!owner.is_null() && EqualSid(sid, owner) != 0)
                    || EqualSid(sid, user_sid) != 0
                    || IsWellKnownSid(sid, WinLocalSystemSid) != 0
                    || IsWellKnownSid(sid, WinBuiltinAdministratorsSid) != 0
                    || IsWellKnownSid(sid, WinCreatorOwnerRightsSid) != 0
            };
            if !trusted {
                return Ok(Some(format!(
                    "its access list lets {} read or write it (restrict it to its owner, \
                     SYSTEM and Administrators: icacls FILE /inheritance:r /grant:r \
                     %USERNAME%:F SYSTEM:F Administrators:F)",
                    sid_text(sid)
                )));
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restricted_file_is_exposed_to_nobody_and_a_loosened_one_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        std::fs::write(&path, b"k").unwrap();
        restrict(&path).unwrap();
        assert_eq!(exposure(&path).unwrap(), None);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
            let why = exposure(&path).unwrap().expect("exposed");
            assert!(why.contains("640"), "{why}");
        }
    }
}
